"""The mini-BDD100K generator: a small data set in the real formats, drawn scene by scene, for the demo and the tests
(make: plan and files; scene: streets and objects; draw: camera and painters). Imports only core and vocab."""
