// A hostile script in JavaScript (a test script): the sandbox must hold the
// same way whatever language built the component. `case` picks the attempt.
import { HostError, Info, Param, archive, exportScript, files, params } from 'offsite-sdk';

const info = Info('hostile-js', '0.1.0', 'tries what a sandboxed script must not manage (test script)', {
  params: [Param.required('case', 'which attempt')],
  capabilities: ['archive', 'files', 'params'],
});

function attempt() {
  const c = params.require('case');
  switch (c) {
    case 'network':
      // No fetch and no sockets: the runner gives a script no network.
      return fetch('http://127.0.0.1:22/');
    case 'archive-outside':
      return archive.tarGz(['/etc'], 'etc.tgz');
    case 'list-outside':
      return files.listDir('/root');
    case 'denied-handled':
      try {
        archive.tarGz(['/etc'], 'etc.tgz');
      } catch (e) {
        if (!(e instanceof HostError) || !e.denied) throw e;
      }
      return undefined;
    case 'allocate': {
      const hog = [];
      for (;;) hog.push(new Uint8Array(16 << 20).fill(1));
    }
    case 'spin':
      for (;;) {}
    case 'raise':
      throw new TypeError('something went wrong\nsecond line');
    default:
      throw new Error(`unknown case ${c}`);
  }
}

export const { describe, run } = exportScript({ info, run: attempt });
