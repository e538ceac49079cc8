<?php
declare(strict_types=1);

namespace App;

/** A very small stand-in for a framework kernel: route a path, render a view. */
final class Application
{
    public function __construct(
        public readonly array $config,
        private readonly array $routes,
        public readonly array $release,
        public readonly string $basePath,
    ) {
    }

    public function handle(string $uri): string
    {
        $path = parse_url($uri, PHP_URL_PATH) ?: '/';
        [$class, $method] = $this->routes[$path] ?? [null, null];
        if ($class === null) {
            http_response_code(404);
            return "Not found\n";
        }
        return (new $class($this))->$method();
    }

    public function view(string $name, array $data): string
    {
        extract($data);
        ob_start();
        require $this->basePath . '/resources/views/' . $name . '.php';
        return (string) ob_get_clean();
    }

    /** Appends a line to the log in storage/, a shared path: it outlives every release. */
    public function log(string $line): void
    {
        @file_put_contents(
            $this->basePath . '/storage/logs/app.log',
            date('c') . ' ' . $line . "\n",
            FILE_APPEND,
        );
    }
}
