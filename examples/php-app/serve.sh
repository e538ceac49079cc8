#!/bin/sh
php -S 127.0.0.1:8000 -t public
