"""The seed API's names (socket.engine 1.x), as exact aliases of the PEP 8 names.

This module is the only place the camelCase names exist.  Each alias resolves to the
very same method (``h.get_ALL == h.get_all``, ``Host.get_ALL is Host.get_all``); the
``*Lock`` variants are the same as the plain ones because every write is thread-safe.
They are left out of ``dir(Host)`` / ``dir(Client)`` and therefore out of ``help(Host)``,
which lists the PEP 8 names only: this table is their one place of documentation.
A type checker sees each alias as the method it names (``h.get_ALL`` has the signature
of ``Host.get_all``) and ``host`` / ``client`` as the classes themselves.

======================  ==========================
seed name               socketengine name
======================  ==========================
``host``                :class:`Host`
``client``              :class:`Client`
``host.get_ALL``        :meth:`Host.get_all`
``host.getClients``     :meth:`Host.clients`
``host.write_ALL``      :meth:`Host.write_all`
``host.writeLock_ALL``  :meth:`Host.write_all`
``host.writeImg_ALL``   :meth:`Host.write_image_all`
``host.writeImgLock_ALL`` :meth:`Host.write_image_all`
``client.writeLock``    :meth:`Client.write`
``client.writeImg``     :meth:`Client.write_image`
``client.writeImgLock`` :meth:`Client.write_image`
======================  ==========================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Type

if TYPE_CHECKING:
    from .sync.client import Client
    from .sync.host import Host


class Alias:
    """A class attribute that is another attribute under an old name."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.__doc__ = f"Seed-compatible alias of :meth:`{target}`."

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        return getattr(obj if obj is not None else objtype, self.target)


class SeedNamesMeta(type):
    """The metaclass of the seed-name mixins: keeps the aliases out of ``dir(cls)``.

    ``help()`` and :func:`inspect.getmembers` list a class's attributes through
    ``dir(cls)``, so the camelCase aliases no longer clutter ``help(Host)`` between the
    real methods. They still resolve normally (``Host.get_ALL``, ``h.get_ALL``), and
    ``dir(h)`` of an instance still lists them, for interactive completion.
    """

    def __dir__(cls) -> List[str]:
        aliases = {
            name
            for klass in cls.__mro__
            for name, value in vars(klass).items()
            if isinstance(value, Alias)
        }
        return sorted(name for name in super().__dir__() if name not in aliases)


class HostSeedNames(metaclass=SeedNamesMeta):
    """Mixed into :class:`Host`: the seed's method names."""

    __slots__ = ()

    if TYPE_CHECKING:  # a type checker sees each alias as the method it names
        get_ALL = Host.get_all
        getClients = Host.clients
        write_ALL = Host.write_all
        writeLock_ALL = Host.write_all
        writeImg_ALL = Host.write_image_all
        writeImgLock_ALL = Host.write_image_all
    else:
        get_ALL = Alias("get_all")
        getClients = Alias("clients")
        write_ALL = Alias("write_all")
        writeLock_ALL = Alias("write_all")
        writeImg_ALL = Alias("write_image_all")
        writeImgLock_ALL = Alias("write_image_all")


class ClientSeedNames(metaclass=SeedNamesMeta):
    """Mixed into :class:`Client`: the seed's method names."""

    __slots__ = ()

    if TYPE_CHECKING:
        writeLock = Client.write
        writeImg = Client.write_image
        writeImgLock = Client.write_image
    else:
        writeLock = Alias("write")
        writeImg = Alias("write_image")
        writeImgLock = Alias("write_image")


def _seed_classes() -> Tuple[Type[Host], Type[Client]]:
    from .sync.client import Client
    from .sync.host import Host

    return Host, Client


if TYPE_CHECKING:  # the classes themselves: ``h: host`` is an annotation too
    host = Host
    client = Client
else:
    host, client = _seed_classes()
