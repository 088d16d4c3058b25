import Foundation
import Synchronization
import VMTemplateOS
import VMTemplateQEMU

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The descriptors callers deposited on `serve`'s descriptor socket (``DescriptorSocket``), each
/// under a token that its depositor then names in an API request (`{"fd": "fd-…"}` in a NIC or
/// disk): how a member of the socket's group attaches a tap or an image it opened itself, since
/// HTTP carries no descriptors.
///
/// A token serves only the uid that deposited it, for ``lifetime``; a request that uses it claims
/// it (a second request naming it meanwhile is refused), spends it when it succeeds and gives it
/// back when it fails, so a retried request finds it again. Bounded per caller and in all: a
/// deposit is an open descriptor in a root process.
package final class DescriptorDeposits: Sendable {
    package static let defaultLifetime: Duration = .seconds(60)
    /// Tokens one caller other than the owner may hold at once.
    package static let perCaller = 16
    /// Tokens the owner (or root) may hold at once.
    package static let perOwner = 64
    package static let limit = 256

    struct Deposit {
        let uid: uid_t
        let descriptor: GivenDescriptor
        let expires: ContinuousClock.Instant
        var claimed = false
    }

    package let lifetime: Duration
    private let deposits = Mutex<[String: Deposit]>([:])

    package init(lifetime: Duration = DescriptorDeposits.defaultLifetime) {
        self.lifetime = lifetime
    }

    /// `fd-` and 32 hex digits: 128 bits from the system's generator, so a token is not guessed.
    static func newToken() -> String {
        var generator = SystemRandomNumberGenerator()
        return "fd-" + (0..<2).map { _ in String(format: "%016llx", generator.next() as UInt64) }.joined()
    }

    /// Whether `text` has a token's shape (checked before it is looked up or shown).
    static func isToken(_ text: String) -> Bool {
        text.utf8.count == 35 && text.hasPrefix("fd-") && text.utf8.dropFirst(3).allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
    }

    /// Keeps `descriptor` for `uid` under `token`. The last ``perOwner`` places are the owner's:
    /// the group's members together cannot fill them.
    package func deposit(_ descriptor: GivenDescriptor, token: String, uid: uid_t, isOwner: Bool) throws {
        let expired = try deposits.withLock { deposits in
            let expired = Self.sweep(&deposits)
            let held = deposits.values.count { $0.uid == uid }
            let allowed = isOwner ? Self.perOwner : Self.perCaller
            guard held < allowed else {
                throw VMTemplateError(.limitExceeded, "uid \(uid) holds \(held) deposited descriptors, the most one caller may: use them or wait until they expire (\(lifetime.shortText)).")
            }
            guard deposits.count < (isOwner ? Self.limit : Self.limit - Self.perOwner) else {
                throw VMTemplateError(.limitExceeded, "the server holds \(deposits.count) deposited descriptors, the most it keeps: try again once some are used or expired (\(lifetime.shortText)).")
            }
            deposits[token] = Deposit(uid: uid, descriptor: descriptor, expires: .now + lifetime)
            return expired
        }
        _ = expired
    }

    /// Takes back a deposit whose token never reached its depositor (the answer could not be
    /// sent).
    package func withdraw(_ token: String) {
        let withdrawn = deposits.withLock { $0.removeValue(forKey: token) }
        _ = withdrawn
    }

    /// The descriptor deposited under `token` by `uid`, if it is a `kind`, marked claimed until
    /// ``settle(_:spent:)``.
    func claim(_ token: String, uid: uid_t, kind: GivenDescriptor.Kind) throws -> GivenDescriptor {
        guard Self.isToken(token) else {
            throw VMTemplateError(.invalidArgument, "fd '\(TerminalText.escape(String(token.prefix(40))))' is not a descriptor token: deposit the descriptor on the server's descriptor socket and give the token it answers (fd-…; docs/api.md, \"Descriptors\").")
        }
        var expired: [Deposit] = []
        defer { _ = expired }
        return try deposits.withLock { deposits in
            expired = Self.sweep(&deposits)
            // Another uid's token is answered as an unknown one: whether it exists is its owner's.
            guard var deposit = deposits[token], deposit.uid == uid else {
                throw VMTemplateError(.invalidArgument, "descriptor token \(token.prefix(11))… is not held for uid \(uid) (a token serves the uid that deposited it, once, for \(lifetime.shortText)): deposit the descriptor again.")
            }
            guard !deposit.claimed else {
                throw VMTemplateError(.busy, "descriptor token \(token.prefix(11))… is being used by another request: give each request descriptors of its own.")
            }
            guard deposit.descriptor.kind == kind else {
                throw VMTemplateError(.invalidArgument, "descriptor token \(token.prefix(11))… holds a \(deposit.descriptor.kind.rawValue), not a \(kind.rawValue): give it as a \(deposit.descriptor.kind == .tap ? "NIC" : "disk").")
            }
            deposit.claimed = true
            deposits[token] = deposit
            return deposit.descriptor
        }
    }

    /// Ends the claims on `tokens`: spent (the request succeeded, or QEMU got a copy of the
    /// descriptor before it failed: the token is gone) or given back for a retry.
    func settle(_ tokens: [String], spent: Bool) {
        let released = deposits.withLock { deposits in
            var released: [Deposit] = []
            for token in tokens {
                guard let deposit = deposits[token] else { continue }
                if spent || deposit.descriptor.isAttached {
                    released.append(deposit)
                    deposits[token] = nil
                } else {
                    deposits[token]?.claimed = false
                }
            }
            return released
        }
        // Their descriptors close here, when these go, outside the lock.
        _ = released
    }

    /// Forgets expired deposits that no request holds (their descriptors close with them, on the
    /// caller's thread, outside the lock).
    package func sweep() {
        let expired = deposits.withLock { Self.sweep(&$0) }
        _ = expired
    }

    /// How many deposits are held now.
    package var count: Int { deposits.withLock { $0.count } }

    private static func sweep(_ deposits: inout [String: Deposit]) -> [Deposit] {
        let now = ContinuousClock.now
        var expired: [Deposit] = []
        for (token, deposit) in deposits where deposit.expires <= now && !deposit.claimed {
            expired.append(deposit)
            deposits[token] = nil
        }
        return expired
    }
}

/// The tokens one API request claims (``DescriptorDeposits/claim(_:uid:kind:)``) through its
/// ``lookup``, settled once when the request ends (``DescriptorDeposits/withClaims(uid:_:)``).
final class DescriptorClaims: Sendable {
    let deposits: DescriptorDeposits
    let uid: uid_t
    private let tokens = Mutex<[String]>([])

    init(deposits: DescriptorDeposits, uid: uid_t) {
        self.deposits = deposits
        self.uid = uid
    }

    var lookup: DescriptorLookup {
        DescriptorLookup { [self] token, kind in
            let descriptor = try deposits.claim(token, uid: uid, kind: kind)
            tokens.withLock { $0.append(token) }
            return descriptor
        }
    }

    func settle(spent: Bool) {
        deposits.settle(tokens.withLock { $0 }, spent: spent)
    }
}

extension DescriptorDeposits {
    /// Runs `body` with a lookup of the caller's deposits; the tokens it claims are spent if it
    /// returns, given back if it throws.
    func withClaims<T>(uid: uid_t?, _ body: (DescriptorLookup) async throws -> T) async throws -> T {
        guard let uid else { return try await body(.none) }
        let claims = DescriptorClaims(deposits: self, uid: uid)
        do {
            let result = try await body(claims.lookup)
            claims.settle(spent: true)
            return result
        } catch {
            claims.settle(spent: false)
            throw error
        }
    }
}
