"""Built-in models shipped with the package (diffusers-layout folders)."""
