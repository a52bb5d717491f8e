// Part of offsite-sdk; see ../index.js.
import * as rawLog from 'offsite:backup/log@0.1.0';

export const log = {
  error: (m) => rawLog.log('error', String(m)),
  warn: (m) => rawLog.log('warn', String(m)),
  info: (m) => rawLog.log('info', String(m)),
  debug: (m) => rawLog.log('debug', String(m)),
};
