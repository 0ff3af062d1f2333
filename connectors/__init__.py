"""Channel connectors: transport, verification and handshakes, one subpackage per channel."""
