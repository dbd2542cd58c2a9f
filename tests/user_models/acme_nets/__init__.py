"""A user's package on sys.path (model.factory: acme_nets.vision:tiny_net); its module imports a sibling."""
