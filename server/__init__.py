"""Hounsfield server: settings, app factory, lifespan, CLI, error mapping, job queue."""
