"""Test helpers shipped with stemdask: Merlin ``.mib`` writing and a replaying Merlin data socket."""
