from jsmaug.data.datasets.preference_pairs.preference_pairs import PreferencePairs, PreferencePairsConfig

__all__ = ["PreferencePairs", "PreferencePairsConfig"]
