%% What the benchmark broker does, second by second: the reductions (Erlang's unit of work) of
%% its processes summed by kind (each process's initial call: rabbit_prequeue for a classic
%% queue, rabbit_channel, rabbit_reader, rabbit_writer, ...), and the time its threads spent in
%% each state (microstate accounting: Erlang code, garbage collection, ports, ...; wall time,
%% which on a machine with more runnable threads than cores includes time the system ran
%% something else). Read beside the broker's CPU per message that `ponte-bench` prints, it tells
%% a broker asked for more work from one asked for the same work that runs slower. Each second
%% also: the messages the channels, classic queues and limiters handled (calls of their
%% `handle_cast`, `handle_info` and `handle_call`, and the channels' `handle_method` for the
%% client's methods, counted by Erlang's call counts), and the broker's collections and words
%% reclaimed so far with the memory in use. Started with `[by_kind]`, also the garbage
%% collections of each kind's processes (minor ones, and a full sweep or a hibernation as one)
%% and each kind's heaps and mailboxes as they stand.
%%
%% Loaded into the running broker and started (each line of FILE a term, once a second):
%%
%%   scripts/broker.sh ctl bench 5691 target/bench-broker eval \
%%     '{ok, M, B} = compile:file("bench/ponte_broker_work.erl", [binary]),
%%      code:load_binary(M, "ponte_broker_work.erl", B), ponte_broker_work:start("/tmp/work").'
%%
%% (or `ponte_broker_work:start("/tmp/work", [by_kind])`),
%%
%% then, for a drain between two clock times (milliseconds since the epoch, as the lines have
%% them) of N messages, the work per message by kind, the messages handled per message, and
%% the time per message by state:
%%
%%   ... eval 'ponte_broker_work:per_message("/tmp/work", From, To, N).'
%%   ... eval 'ponte_broker_work:levels("/tmp/work", From, To).'
%%   ... eval 'ponte_broker_work:stop().'
%%
%% The first line counts each process's work since it started. Each second's lines cost the
%% broker about 3% of a core with 18,500 processes (Ponte with 1,001 partners connected), 12%
%% with `by_kind`: the broker's CPU that `ponte-bench` reads from `/proc` meanwhile includes it
%% (with `by_kind`, at 6,700 msg/s, some 17 µs per message; at 10,000, 12).
-module(ponte_broker_work).
-export([start/1, start/2, stop/0, loop/4, per_message/4, levels/3]).

%% The functions whose calls are counted: the messages each kind of process handled.
handlers() ->
    [{M, F, A} || M <- [rabbit_channel, rabbit_amqqueue_process, rabbit_limiter],
                  {F, A} <- [{handle_cast, 2}, {handle_info, 2}, {handle_call, 3}]]
    ++ [{rabbit_channel, handle_method, 3}].

start(File) ->
    start(File, []).

%% Options: `by_kind` also writes each kind's collections, heaps and mailboxes, which triples
%% what the tool costs the broker (see the header).
start(File, Options) ->
    catch stop(),
    erlang:system_flag(microstate_accounting, true),
    [erlang:trace_pattern(MFA, true, [call_count]) || MFA <- handlers()],
    ByKind = lists:member(by_kind, Options),
    register(?MODULE, spawn(?MODULE, loop, [File, ByKind, #{}, #{}])),
    ok.

stop() ->
    ?MODULE ! stop,
    erlang:system_flag(microstate_accounting, false),
    [erlang:trace_pattern(MFA, false, [call_count]) || MFA <- handlers()],
    ok.

loop(File, ByKind, Before, Counted) ->
    Now = os:system_time(millisecond),
    Kind = fun(P) ->
        case Before of
            #{P := {K, _, _}} -> K;
            _ -> proc_lib:translate_initial_call(P)
        end
    end,
    Items = case ByKind of
        true -> [reductions, garbage_collection, total_heap_size, message_queue_len];
        false -> [reductions]
    end,
    Infos = [{P, Info} || P <- processes(),
        Info <- [erlang:process_info(P, Items)], Info =/= undefined],
    After = maps:from_list([{P, {Kind(P), R, minor_gcs(Rest)}}
                            || {P, [{reductions, R} | Rest]} <- Infos]),
    %% A process's minor collections counted since its last full sweep (or hibernation, which
    %% sweeps): a count lower than the last second's means a sweep, counted as one more.
    {Work, Collected} = maps:fold(fun(P, {K, R, G}, {W, C}) ->
        {Done, Swept} = case Before of
            #{P := {_, R0, G0}} when G >= G0 -> {R - R0, G - G0};
            #{P := {_, R0, _}} -> {R - R0, G + 1};
            _ -> {R, G}
        end,
        {maps:update_with(K, fun(X) -> X + Done end, Done, W),
         maps:update_with(K, fun(X) -> X + Swept end, Swept, C)}
    end, {#{}, #{}}, After),
    Levels = lists:foldl(fun({P, [_, _, {total_heap_size, H}, {message_queue_len, Q}]}, L) ->
                                 #{P := {K, _, _}} = After,
                                 maps:update_with(K, fun({H0, Q0, N}) -> {H0 + H, Q0 + Q, N + 1} end,
                                                  {H, Q, 1}, L);
                            (_, L) -> L
                         end, #{}, Infos),
    States = erlang:statistics(microstate_accounting),
    erlang:system_flag(microstate_accounting, reset),
    Times = lists:foldl(fun(#{type := Type, counters := Counters}, Acc) ->
        maps:fold(fun(State, T, A) ->
            Us = erlang:convert_time_unit(T, perf_counter, microsecond),
            maps:update_with({Type, State}, fun(X) -> X + Us end, Us, A)
        end, Acc, Counters)
    end, #{}, States),
    {Collections, Reclaimed, 0} = erlang:statistics(garbage_collection),
    Counts = maps:from_list([{MFA, N} || MFA <- handlers(),
                                         {call_count, N} <- [erlang:trace_info(MFA, call_count)],
                                         is_integer(N)]),
    Handled = [{MFA, N - maps:get(MFA, Counted, 0)} || {MFA, N} <- maps:to_list(Counts)],
    Lines = [{reductions, Now, map_size(After), maps:to_list(Work)},
             {handled, Now, Handled}]
        ++ [{collections, Now, map_size(After), maps:to_list(Collected)} || ByKind]
        ++ [{levels, Now, [{K, {heap_words, H}, {mailbox, Q}, {processes, N}}
                           || {K, {H, Q, N}} <- maps:to_list(Levels)]} || ByKind]
        ++ [{memory, Now, [{collections, Collections}, {words_reclaimed, Reclaimed}
                           | erlang:memory([total, processes, binary, ets])]},
            {microseconds, Now, [{S, Us} || {S = {_, State}, Us} <- maps:to_list(Times),
                                             State =/= sleep]}],
    ok = file:write_file(File, [io_lib:format("~w.~n", [L]) || L <- Lines], [append]),
    receive stop -> ok after 1000 -> ?MODULE:loop(File, ByKind, After, Counts) end.

%% A process's minor collections since its last full sweep; 0 when not asked for.
minor_gcs([{garbage_collection, GC} | _]) ->
    {minor_gcs, N} = lists:keyfind(minor_gcs, 1, GC),
    N;
minor_gcs(_) ->
    0.

%% The lines from From to To (milliseconds), summed and divided by Messages: reductions by
%% kind, then microseconds by thread type and state, each largest first.
per_message(File, From, To, Messages) ->
    {ok, Lines} = file:consult(File),
    Sum = fun(Tag) ->
        Totals = lists:foldl(fun({T, Ms, _, Parts}, Acc) when T =:= Tag, Ms >= From, Ms =< To ->
                                     add(Parts, Acc);
                                ({T, Ms, Parts}, Acc) when T =:= Tag, Ms >= From, Ms =< To ->
                                     add(Parts, Acc);
                                (_, Acc) -> Acc
                             end, #{}, Lines),
        lists:reverse(lists:keysort(2, [{K, round(V / Messages * 100) / 100}
                                        || {K, V} <- maps:to_list(Totals)]))
    end,
    [{reductions, Sum(reductions)}, {collections, Sum(collections)},
     {handled, Sum(handled)}, {microseconds, Sum(microseconds)}].

%% The lines from From to To: each kind's heap (words) and mailbox (messages waiting) summed
%% over its processes, averaged over the seconds, largest heap first.
levels(File, From, To) ->
    {ok, Lines} = file:consult(File),
    Seconds = [Parts || {levels, Ms, Parts} <- Lines, Ms >= From, Ms =< To],
    Totals = lists:foldl(fun(Parts, Acc) ->
        lists:foldl(fun({K, {heap_words, H}, {mailbox, Q}, {processes, N}}, A) ->
            maps:update_with(K, fun({H0, Q0, N0}) -> {H0 + H, Q0 + Q, N0 + N} end, {H, Q, N}, A)
        end, Acc, Parts)
    end, #{}, Seconds),
    Count = max(1, length(Seconds)),
    lists:reverse(lists:keysort(2, [{K, round(H / Count), round(Q / Count), round(N / Count)}
                                    || {K, {H, Q, N}} <- maps:to_list(Totals)])).

add(Parts, Acc) ->
    lists:foldl(fun({K, V}, A) -> maps:update_with(K, fun(X) -> X + V end, V, A) end, Acc, Parts).
