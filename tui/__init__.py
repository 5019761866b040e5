"""The Textual dashboard of gaussreg (`gaussreg tui`): a client of the run store and of
gaussreg's public API (store readers, gaussreg.launch.request). The only import from `gaussreg/`
is `gaussreg tui` starting the app, lazily (pyproject's import-linter contracts)."""
