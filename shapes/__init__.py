"""The shapes world: a tiny procedural video domain in which layout control is seen and measured on a CPU."""
