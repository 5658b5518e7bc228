"""The bundled demo (scikit-learn's digits) and the model zoo the tests and benchmarks use."""

# What sepconv-demo's command line needs without importing TensorFlow (digits.py imports it).
# sepconv-demo --quick: the same network and steps at a quarter of the width (16x fewer MACs), trained 4 epochs.
QUICK_FILTERS = (16, 32, 64)
QUICK_EPOCHS = 4


def model_file(quick: bool = False) -> str:
    """The demo model's file name in the demo's folder (the quick demo's narrower network has its own)."""
    return "digits_tutorial_quick.h5" if quick else "digits_tutorial.h5"
