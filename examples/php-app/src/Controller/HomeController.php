<?php
declare(strict_types=1);

namespace App\Controller;

final class HomeController
{
    public function __construct(private array $config) {}

    public function show(string $uri): string
    {
        $name = htmlspecialchars($this->config['name'], ENT_QUOTES);
        $template = file_get_contents(__DIR__ . '/../../templates/home.html');
        return str_replace(['{{name}}', '{{uri}}'], [$name, htmlspecialchars($uri)], $template);
    }
}
