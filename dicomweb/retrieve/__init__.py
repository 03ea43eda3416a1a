"""WADO-RS and rendered resources (PS3.18 10.4): the retrieve service (`service`), response bodies (`bodies`),
frames (`frames`), renditions kept ahead of requests (`renditions`), and rendered resources (`rendered`,
`render_params`)."""
