"""Import and export of OCI image layouts, docker-save archives and layer tars."""
