<?php
declare(strict_types=1);

require __DIR__ . '/../src/Kernel.php';

$kernel = new App\Kernel(require __DIR__ . '/../config/app.php');
echo $kernel->handle($_SERVER['REQUEST_URI'] ?? '/');
