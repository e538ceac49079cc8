<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title><?= htmlspecialchars($name) ?></title></head>
<body>
  <h1><?= htmlspecialchars($name) ?> (<?= htmlspecialchars($env) ?>)</h1>
  <p>Release <strong><?= htmlspecialchars((string) $release) ?></strong>,
     built in <code><?= htmlspecialchars($releaseDir) ?></code>.</p>
  <p>This request runs from <code><?= htmlspecialchars($servedFrom) ?></code>.</p>
</body>
</html>
