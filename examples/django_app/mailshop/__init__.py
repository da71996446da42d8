"""mailshop: a tiny Django project that sends its order mail through mailworker."""
