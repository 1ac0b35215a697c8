# Verbatim from the seed README (../shared/seed/socket.engine-README.md), Client example.
from socketengine import client

c = client()
c.start()

c.write("test", "client is connected!")

c.close()
