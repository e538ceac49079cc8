<?php
declare(strict_types=1);

namespace App;

require __DIR__ . '/Controller/HomeController.php';

final class Kernel
{
    public function __construct(private array $config) {}

    public function handle(string $uri): string
    {
        $controller = new Controller\HomeController($this->config);
        return $controller->show($uri);
    }
}
