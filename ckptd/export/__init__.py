"""CoreML export: capture, convert, verify (on Linux too), publish atomically. coremltools is imported lazily."""
