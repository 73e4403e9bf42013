"""The kiln network on the host: config, pure logic, leases, taps, namespaces, NAT."""
