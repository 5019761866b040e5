"""The floor: how settings are declared and checked (schema), and how a name in a spec
becomes the user's code (plugins). Imports nothing of gaussreg."""
