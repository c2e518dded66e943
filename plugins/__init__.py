"""Built-in plugins (installed as ``marcache.plugins``). Official MAR behaviour lives here too."""
