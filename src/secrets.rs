//! Key material that wipes itself and stays in locked memory.
