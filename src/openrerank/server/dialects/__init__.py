"""One module per API dialect: parse the wire request, call the engine, answer in the dialect's shape."""
