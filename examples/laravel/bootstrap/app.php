<?php
// Boots the app: configuration, routes, and the release this code belongs to.
declare(strict_types=1);

require __DIR__ . '/../app/Application.php';
require __DIR__ . '/../app/Http/Controllers/HomeController.php';

// Written by flip.toml's before_activate hook inside the release, before it went live.
$release = is_file(__DIR__ . '/cache/release.php')
    ? require __DIR__ . '/cache/release.php'
    : ['release' => 'none (not deployed by flip)', 'dir' => dirname(__DIR__)];

return new App\Application(
    require __DIR__ . '/../config/app.php',
    require __DIR__ . '/../routes/web.php',
    $release,
    dirname(__DIR__),
);
