<?php
// The front controller: the web server's root is TARGET/current/public.
declare(strict_types=1);

$app = require __DIR__ . '/../bootstrap/app.php';

echo $app->handle($_SERVER['REQUEST_URI'] ?? '/');
