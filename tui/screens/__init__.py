"""The dashboard's screens, one per module; the app and the tests take them from here."""

from .compare import CompareScreen
from .confirm import ConfirmScreen
from .detail import RunDetailScreen
from .help import HelpScreen
from .launch import LaunchScreen
from .launches import LaunchesScreen
from .overlay import OverlayScreen
from .runs import RunsScreen
from .sort import SortScreen

__all__ = ["CompareScreen", "ConfirmScreen", "RunDetailScreen", "HelpScreen",
           "LaunchScreen", "LaunchesScreen", "OverlayScreen", "RunsScreen",
           "SortScreen"]
