"""Gateway policy, framework-free: authentication now; limits, usage, tables later."""
