"""HTTP handlers: parse requests into typed values, call one service, serialize."""
