<?php
// Settings from .env (a shared file: one per target, kept across releases).
declare(strict_types=1);

$env = [];
$file = __DIR__ . '/../.env';
foreach (is_file($file) ? file($file, FILE_IGNORE_NEW_LINES | FILE_SKIP_EMPTY_LINES) : [] as $line) {
    if ($line[0] !== '#' && str_contains($line, '=')) {
        [$k, $v] = explode('=', $line, 2);
        $env[trim($k)] = trim($v, " \t\"'");
    }
}

return [
    'name' => $env['APP_NAME'] ?? 'flip example',
    'env' => $env['APP_ENV'] ?? 'production',
    'debug' => ($env['APP_DEBUG'] ?? 'false') === 'true',
];
