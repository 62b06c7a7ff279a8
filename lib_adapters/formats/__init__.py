"""Reading model files safely, detecting their family from keys and shapes, converting layouts."""
