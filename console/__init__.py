"""Everything a person runs: the `refund` CLI, the client operations behind it, the dev stack,
seed data and the demo. The top floor: it may import every package below it; nothing imports it."""
