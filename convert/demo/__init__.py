"""The bundled demo (scikit-learn's digits) and the model zoo the tests and benchmarks use."""
