"""Deployment on real devices: partition files for SuperNodes (server/, pi/ and compose files beside)."""
