// Preloaded with `node -r ./loopback.js`: arlocal calls listen(port) with no host, which binds every interface.
// A test gateway has no business outside the machine, so a listen on a bare port is bound to 127.0.0.1 instead.
'use strict';
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const port = args[0];
  if (typeof port === 'number' || (typeof port === 'string' && /^\d+$/.test(port))) {
    const callback = args.find((a) => typeof a === 'function');
    return listen.call(this, { port: Number(port), host: '127.0.0.1' }, callback);
  }
  return listen.apply(this, args);
};
