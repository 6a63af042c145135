"""`dit-serve eval`: how well the bundled models follow their labels, judged analytically."""
