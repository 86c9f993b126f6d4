"""The one training core shared by textual inversion and hypernetwork training."""
