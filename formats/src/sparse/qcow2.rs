//! A qcow2 target writer (not written yet).
