"""espswitchd's control plane: OVSDB (through the ovs IDL), appctl, and the main loop."""
