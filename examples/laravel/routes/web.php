<?php
declare(strict_types=1);

use App\Http\Controllers\HomeController;

return [
    '/' => [HomeController::class, 'index'],
    '/health' => [HomeController::class, 'health'],
];
