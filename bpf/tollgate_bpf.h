/* tollgate_bpf.h — what flows.bpf.c and its loader (appliance/flows/bpf.py) share.
 *
 * The structures are read by Python through ctypes (appliance/flows/bpf.py mirrors them
 * field for field), so every field is naturally aligned and padding is explicit. Change
 * one side, change the other: tests/flows/test_bpf_layout.py compares the sizes.
 */
#ifndef TOLLGATE_BPF_H
#define TOLLGATE_BPF_H

/* A flow, always oriented from the agent's side: saddr/sport are the agent's. IPv4
 * addresses take the first four bytes of the 16. ICMP flows carry type << 8 | code in
 * dport and the echo identifier in sport. */
struct tg_flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;   /* host byte order */
	__u16 dport;   /* host byte order */
	__u8 family;   /* 4 or 6 */
	__u8 proto;    /* IPPROTO_*; for an IPv6 extension-header chain, the first next header */
	__u16 pad;
};

/* Directions of the counters: 0 from the agent (TC ingress), 1 to it (TC egress). */
struct tg_flow_val {
	__u64 first_ns;   /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 last_ns;
	__u64 packets[2];
	__u64 bytes[2];
	__u32 ifindex;
	__u8 flags[2];    /* TCP flags seen, each direction (FIN 0x01 … CWR 0x80) */
	__u8 verdict;     /* TG_VERDICT_* */
	__u8 reason;      /* TG_REASON_* */
	__u8 state;       /* TG_STATE_* bits */
	__u8 pad[7];
};

/* What the ring buffer carries: a flow as it closed (FIN both ways, or a RST). */
struct tg_flow_event {
	struct tg_flow_key key;
	struct tg_flow_val val;
};

/* An address or network in the agents and protected tries: prefixlen counts the family
 * byte too (8 + the network's own prefix length). */
struct tg_lpm_key {
	__u32 prefixlen;
	__u8 family;
	__u8 addr[16];
	__u8 pad[3];
};

/* A target's address and port (targets: its action; allowed: a target's allow_ports). */
struct tg_endpoint {
	__u8 addr[16];
	__u16 port;   /* host byte order */
	__u8 family;
	__u8 pad;
};

#define TG_VERDICT_INTERCEPTED 1  /* TCP to a target's address and port: the proxy takes it */
#define TG_VERDICT_PASSED      2  /* routed as usual (not protected, an allowed port, or recorded only) */
#define TG_VERDICT_DROPPED     3  /* dropped at TC ingress by the bypass guard */

#define TG_REASON_NONE            0
#define TG_REASON_OTHER_PORT      1   /* TCP to a protected address, not a target's port */
#define TG_REASON_UDP             2
#define TG_REASON_ICMP            3
#define TG_REASON_FRAGMENT        4   /* IPv4 fragment, or an IPv6 fragment header */
#define TG_REASON_IPV6_EXT        5   /* an IPv6 extension-header chain */
#define TG_REASON_IP_OPTIONS      6   /* IPv4 header with options */
#define TG_REASON_NOT_DIVERTED    7   /* a TCP segment of no diverted connection (no SYN seen) */
#define TG_REASON_SOURCE          8   /* a source outside the agent set */
#define TG_REASON_OTHER_PROTO     9
#define TG_REASON_LEDGER_FULL     10  /* a new diverted connection while the flow map was full */
#define TG_REASON_ALLOWED_PORT    11  /* passed: one of the target's allow_ports */
#define TG_REASON_MALFORMED       12  /* a header cut short */
#define TG_REASONS                13

#define TG_STATE_FIN_IN   0x01
#define TG_STATE_FIN_OUT  0x02
#define TG_STATE_CLOSED   0x04
#define TG_STATE_RST      0x08

/* Actions of protected networks and targets: what a bypass towards them gets. */
#define TG_ACTION_DROP    1
#define TG_ACTION_RECORD  2

/* counters (per CPU): [0, TG_REASONS) packets dropped by reason, then these. */
#define TG_CTR_OVERFLOW     (TG_REASONS + 0)  /* a flow the map had no room for */
#define TG_CTR_EVENTS_LOST  (TG_REASONS + 1)  /* a close event the ring buffer had no room for */
#define TG_CTR_PASSED       (TG_REASONS + 2)  /* packets passed (agent side) */
#define TG_CTR_INTERCEPTED  (TG_REASONS + 3)  /* packets of intercepted flows (agent side) */
#define TG_CTR_RECORDED     (TG_REASONS + 4)  /* bypass packets let through (record mode or guard off) */
#define TG_CTR_UNTRACKED    (TG_REASONS + 5)  /* packets of no recorded flow (neither agent nor protected) */
#define TG_COUNTERS         (TG_REASONS + 6)

/* settings[0] */
struct tg_settings {
	__u32 guard;   /* 1: drop bypasses (per target action); 0: record only, never drop */
	__u32 pad;
};

#endif
