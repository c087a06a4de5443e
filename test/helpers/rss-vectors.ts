/**
 * Microsoft "Verifying the RSS Hash Calculation" tables (also in the Intel
 * 82599 datasheet, 7.1.2.8.3 "RSS Verification Suite", and DPDK's
 * app/test/test_thash.c). Columns: destination, source, hash over the
 * addresses only, hash over addresses + TCP ports.  For the tests of
 * lib/datapath/steering.ts (Toeplitz) and lib/datapath/bpf.ts (the same hash in eBPF).
 */
export const IPV4_VECTORS = [
  { dst: '161.142.100.80', dport: 1766, src: '66.9.149.187', sport: 2794, ip: 0x323e8fc2, tcp: 0x51ccc178 },
  { dst: '65.69.140.83', dport: 4739, src: '199.92.111.2', sport: 14230, ip: 0xd718262a, tcp: 0xc626b0ea },
  { dst: '12.22.207.184', dport: 38024, src: '24.19.198.95', sport: 12898, ip: 0xd2d0a5de, tcp: 0x5c2b394a },
  { dst: '209.142.163.6', dport: 2217, src: '38.27.205.30', sport: 48228, ip: 0x82989176, tcp: 0xafc7327f },
  { dst: '202.188.127.2', dport: 1303, src: '153.39.163.191', sport: 44251, ip: 0x5d1809c5, tcp: 0x10e828a2 },
] as const;

export const IPV6_VECTORS = [
  {
    dst: '3ffe:2501:200:3::1',
    dport: 1766,
    src: '3ffe:2501:200:1fff::7',
    sport: 2794,
    ip: 0x2cc18cd5,
    tcp: 0x40207d3d,
  },
  {
    dst: 'ff02::1',
    dport: 4739,
    src: '3ffe:501:8::260:97ff:fe40:efab',
    sport: 14230,
    ip: 0x0f0c461c,
    tcp: 0xdde51bbf,
  },
  {
    dst: 'fe80::200:f8ff:fe21:67cf',
    dport: 38024,
    src: '3ffe:1900:4545:3:200:f8ff:fe21:67cf',
    sport: 44251,
    ip: 0x4b61e985,
    tcp: 0x02d1feef,
  },
] as const;
