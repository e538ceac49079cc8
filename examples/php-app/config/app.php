<?php
return [
    'name' => 'flip example app',
    'release' => basename(dirname(__DIR__)),
];
