"""Shared types: the bottom layer, imported by every other package of ours and importing none.

The canonical message and raw envelope (`model`), the error hierarchy (`errors`), the event
contract (`events`), the settings schema (`settings`) and the channel seam (`channel`).
"""
