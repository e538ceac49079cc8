<?php
declare(strict_types=1);

namespace App\Http\Controllers;

use App\Application;

final class HomeController
{
    public function __construct(private readonly Application $app)
    {
    }

    public function index(): string
    {
        $this->app->log('GET /');
        return $this->app->view('home', [
            'name' => $this->app->config['name'],
            'env' => $this->app->config['env'],
            'release' => $this->app->release['release'],
            'releaseDir' => $this->app->release['dir'],
            // What this request's files resolved to: releases/N, not current/, when the web
            // server passes $realpath_root (see the README's "OPcache and the realpath cache").
            'servedFrom' => realpath($this->app->basePath) ?: $this->app->basePath,
        ]);
    }

    public function health(): string
    {
        return "ok\n";
    }
}
