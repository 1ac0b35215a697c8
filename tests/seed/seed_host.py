# Verbatim from the seed README (../shared/seed/socket.engine-README.md), Host example.
from socketengine import host

h = host()
h.start()

while True:
	data = h.get_ALL("test")

	if data is not None:
		for item in data:
			print(item)
			break

h.close()
