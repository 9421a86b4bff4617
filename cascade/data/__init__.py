"""Data for flaresweep: image I/O, the procedural flare benchmark, Flare7K readers, test sets.

Modules are imported explicitly (`from cascade.data import synthetic`) so that importing the
package stays cheap; see docs/design.md for the contracts.
"""
