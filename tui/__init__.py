"""The Textual dashboard of gaussreg (`gaussreg tui`): a client of the run store and of
gaussreg's public API. Nothing in `gaussreg/` imports this package."""
