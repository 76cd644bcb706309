"""Security: who may call, where the listeners bind, what never leaks, and the dependency audit."""
